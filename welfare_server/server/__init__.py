"""The gRPC server (welfare.v1): steered generation, concept vectors and maze rollouts over one
engine. app.WelfareServer serves; client.WelfareClient / AsyncWelfareClient call it."""
